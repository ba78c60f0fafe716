// Points the Huawei Cloud Go SDK v3 (KMS v2, Access= signing) at the emulator.
package main

import (
	"fmt"
	"os"

	"github.com/huaweicloud/huaweicloud-sdk-go-v3/core/auth/basic"
	kms "github.com/huaweicloud/huaweicloud-sdk-go-v3/services/kms/v2"
	"github.com/huaweicloud/huaweicloud-sdk-go-v3/services/kms/v2/model"
)

func check(err error, what string) {
	if err != nil {
		fmt.Printf("FAIL %s: %v\n", what, err)
		os.Exit(1)
	}
}

func main() {
	base := os.Args[1]
	credentials := basic.NewCredentialsBuilder().
		WithAk("EMULATORACCESSKEY000").WithSk("emulator-secret-key-0000000000000000000").
		WithProjectId("0a1b2c3d4e5f40718293a4b5c6d7e8f9").Build()
	client := kms.NewKmsClient(kms.KmsClientBuilder().WithEndpoint(base).WithCredential(credentials).Build())
	created, err := client.CreateKey(&model.CreateKeyRequest{Body: &model.CreateKeyRequestBody{KeyAlias: "huawei-sdk"}})
	check(err, "create-key")
	keyID := *created.KeyInfo.KeyId
	name, retiring := "g1", "abc123"
	grant, err := client.CreateGrant(&model.CreateGrantRequest{Body: &model.CreateGrantRequestBody{
		KeyId: keyID, GranteePrincipal: "abc123", Operations: []string{"describe-key", "create-datakey"},
		Name: &name, RetiringPrincipal: &retiring}})
	check(err, "create-grant")
	limit := "10"
	listed, err := client.ListGrants(&model.ListGrantsRequest{Body: &model.ListGrantsRequestBody{KeyId: keyID, Limit: &limit}})
	check(err, "list-grants")
	fmt.Printf("key %s grant %s listed %d total %d truncated %q\n", keyID, *grant.GrantId, len(*listed.Grants), *listed.Total, *listed.Truncated)
	_, err = client.CancelGrant(&model.CancelGrantRequest{Body: &model.RevokeGrantRequestBody{KeyId: keyID, GrantId: *grant.GrantId}})
	check(err, "revoke-grant")
	fmt.Println("OK")
}
